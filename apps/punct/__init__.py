"""The punctuation and capitals recipe: prepare, train, evaluate, export (docs/punctuation.md)."""
