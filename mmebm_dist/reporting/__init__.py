"""Writing documents from measured figures: the table helpers shared by report.md, results.md and
questions.md (``tables``)."""
