"""Security tests: authentication, TLS, CORS and audit against real servers."""
