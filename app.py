"""Run the DiffusionRig app from a checkout: ``python app.py`` (the same app as ``diffusionrig app``).

Also a Hugging Face Space entry point (Spaces run ``python app.py``; the ready-made Space is in
``space/``). Settings come from DIFFUSIONRIG_* environment variables (see docs/APP.md); the host
and port from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which Spaces set.
"""
from gradio_app import AppConfig, build_demo, serve

demo = build_demo(AppConfig.from_env())  # cheap: models load on the first request

if __name__ == "__main__":
    serve(demo)
