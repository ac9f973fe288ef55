"""`avsync app`: the model's alignment in a browser (Gradio, the optional extra `avsync[app]`)."""
