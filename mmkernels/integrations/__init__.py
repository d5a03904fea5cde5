"""One-call integrations with the libraries our users train with (``open_clip``)."""
