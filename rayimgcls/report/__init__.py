"""HTML reports a person opens from disk: one self-contained file each, nothing fetched.

`html.py` is the toolkit every report shares (page shell, escaping, inlined images, sortable tables, figures);
`evaluation.py` is the report of `rayimgcls evaluate`. Imports nothing heavy: each report module pulls in
matplotlib and PIL only when it renders.
"""
