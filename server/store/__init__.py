"""The store layer: interfaces the rest of the code talks to, with a single-box implementation
(SQLite + local files) and a shared one (PostgreSQL + S3); nothing outside server/store knows
which is in use."""
