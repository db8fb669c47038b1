"""DiffusionRig's Gradio app: ``build_demo()`` returns the Blocks, ``launch()`` serves it.

Importing this package is cheap (Gradio itself is imported by ``build_demo``); models and the
face rig load on the first request. See docs/APP.md.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from .app import AppConfig, Engine

__all__ = ["AppConfig", "Engine", "build_demo", "launch", "serve"]


def build_demo(config: AppConfig | None = None, engine: Engine | None = None, **config_kwargs: Any):
    """The app's ``gr.Blocks`` with its queue set up. Give an ``AppConfig``, its fields as keywords,
    or a ready ``Engine`` (tests share one)."""
    from . import ui

    if engine is None:
        engine = Engine(config or AppConfig(**config_kwargs))
    elif config is not None or config_kwargs:
        raise TypeError("give either an engine or a config, not both")
    demo = ui.build(engine)
    # Each edit holds a model's activations: run only a few at once; the rest wait in line.
    demo.queue(default_concurrency_limit=engine.config.concurrency_limit, max_size=64)
    demo.diffusionrig_engine = engine  # for launch() and tests
    return demo


def serve(demo, *, host: str | None = None, port: int | None = None, share: bool = False,
          open_browser: bool = False, block: bool = True, quiet: bool = False):
    """Serve a Blocks made by ``build_demo``. ``host``/``port`` default to ``GRADIO_SERVER_NAME`` /
    ``GRADIO_SERVER_PORT`` (set by Hugging Face Spaces), else 127.0.0.1:7860. ``block=False``
    returns ``(demo, url)`` with the server running (stop it with ``demo.close()``)."""
    from . import ui

    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    cfg = demo.diffusionrig_engine.config
    # results, personal models and demo photos live in the work folder: a temporary one by default,
    # which Gradio serves anyway; a chosen one must be allowed. Nothing else is served.
    allowed = [str(cfg.work_dir)] if cfg.work_dir is not None else None
    _, local_url, share_url = demo.launch(
        server_name=host, server_port=port, share=share, inbrowser=open_browser, quiet=quiet,
        prevent_thread_lock=True, show_error=True, allowed_paths=allowed,
        max_file_size=f"{int(cfg.max_upload_mb * 4)}mb", css=ui.CSS, footer_links=["api", "gradio"],
    )
    url = share_url or local_url
    # the demo world, the face rig and the default model get ready while the first page loads
    threading.Thread(target=demo.diffusionrig_engine.warm_up, name="diffusionrig-warm-up", daemon=True).start()
    if not block:
        return demo, url
    try:
        demo.block_thread()
    finally:
        demo.close()
    return demo, url


def launch(config: AppConfig | None = None, *, engine: Engine | None = None, host: str | None = None,
           port: int | None = None, share: bool = False, open_browser: bool = False, block: bool = True,
           quiet: bool = False, **config_kwargs: Any):
    """``build_demo`` + ``serve``: what ``diffusionrig app`` runs."""
    demo = build_demo(config, engine, **config_kwargs)
    return serve(demo, host=host, port=port, share=share, open_browser=open_browser, block=block, quiet=quiet)
