"""The web demo: `handlers.py` (plain functions, no web library: tested directly) and `app.py` (the Gradio
page that calls them)."""
