"""The federation director: registry of namespaces and caches, cache selection and
the Pelican protocol (see docs/director.md)."""
