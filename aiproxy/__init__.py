"""aiproxy: a gRPC-native middle tier for AI agent services.

The one name the wheel installs. Its parts live in the repository's top-level folders
(the design card fixes them): `aiproxy.core` is core/, `aiproxy.interceptors` is
interceptors/, `aiproxy.server` is server/, `aiproxy.agent` is agent/ (the reference
agent), and `aiproxy.ai` holds the stubs `make gen` generates from proto/. In a checkout
the folders are reached through the symbolic links beside this file; the wheel copies
them in (pyproject.toml, [tool.setuptools]).
"""
