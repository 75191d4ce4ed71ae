"""The traveller-and-local web app, served on the client port from files built by ``clients/web``."""

from ._site import WebApp as WebApp
from ._site import content_security_policy as content_security_policy

__all__ = ["WebApp", "content_security_policy"]
