"""What the Slicer module needs that does not need Slicer: command lines, packages, models, the findings
table, the background process, corrections, and what the rating and comparison sections show. Never
imports slicer, qt, ctk or vtk."""
