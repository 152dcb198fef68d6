"""The runbooks: one Markdown page per alert and per procedure, and the Fabric tasks (runbooks.tasks) that carry them out."""
