"""Hugging Face Space entry point for DiffusionRig.

The package (``diffusionrig``, with ``gradio_app``) is installed by requirements.txt. With no
FLAME/DECA assets configured the Space runs the built-in synthetic demo; to serve real models, see
README.md in this folder. Settings are the DIFFUSIONRIG_* variables of docs/APP.md (set them under
the Space's Settings -> Variables).
"""
import os

from gradio_app import AppConfig, build_demo, serve

# A shared machine: modest defaults so the queue keeps moving (a Space variable overrides them).
os.environ.setdefault("DIFFUSIONRIG_MAX_STEPS", "50")
os.environ.setdefault("DIFFUSIONRIG_CONCURRENCY", "1")

demo = build_demo(AppConfig.from_env())  # cheap: models load on the first request

if __name__ == "__main__":
    serve(demo)
