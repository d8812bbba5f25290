"""The aiproxy process: configuration, assembly, forwarding, upstream pool, health, CLI."""
