"""Importers that turn other frameworks' checkpoints into mmgen exports (docs/export.md)."""
