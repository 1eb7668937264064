"""`vitlab serve`: a local web app to look at trained runs in a browser.

    runs.py     the run folders being served: checked and loaded before the server starts
    uploads.py  an uploaded file → a 32×32 image, or a one-line refusal (not an image, too large)
    views.py    what the page shows, as plain functions of (run, image): top-5 classes, Grad-CAM,
                attention rollout and per-layer/per-head attention as overlays, confusion matrix, curves
    app.py      the Gradio layout and its events (the only module that imports gradio)

Everything but app.py is testable without a browser or gradio.
"""
