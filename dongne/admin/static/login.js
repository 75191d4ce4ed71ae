// dongne admin sign-in: a one-time link (/admin/login?code=...) is exchanged
// for the session cookie by posting the code back at once; the code leaves
// the address bar first, so it is not kept in this tab's history entry.
"use strict";

(() => {
  const form = document.getElementById("code-form");
  if (!form) return;
  window.history.replaceState(null, "", "/admin/login");
  form.submit();
})();
