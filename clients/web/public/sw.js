// dongne's service worker. It exists only for system notifications: Android Chrome has no
// `new Notification()` ("Illegal constructor") and shows them through a service worker's
// registration.showNotification(). No fetch handler, no caching: the page is always the
// server's. A tap on a notification focuses the app's tab (which opens the question) or opens it.
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));
self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const tag = event.notification.tag;
  const url = new URL(`./#/q/${encodeURIComponent(tag)}`, self.registration.scope).href;
  event.waitUntil((async () => {
    const tabs = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
    if (tabs.length > 0) {
      // Every tab hears it; the one that showed this notification opens the question. (Which
      // tab that was is not known here: two tabs may be two users.)
      for (const tab of tabs) tab.postMessage({ type: "notificationclick", tag });
      await (tabs.find((c) => c.focused) ?? tabs[0]).focus();
    } else {
      await self.clients.openWindow(url);
    }
  })());
});
