"""The engine: claiming, leasing, running handlers, group-committing completions."""
