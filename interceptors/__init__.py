"""Server and client interceptors: one concern per module, assembled in chain.py."""
