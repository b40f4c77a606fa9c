"""Quiet libraries while fluxrt works: a good run prints fluxrt's progress and nothing alarming.

transformers warns that its image processors fall back to PIL without torchvision (FLUX uses no image
processor) and draws a progress bar for every shard it writes; diffusers likewise. Inside ``quiet_hf()``
both log errors only and draw no bars; their settings are put back on the way out, so an application
that embeds fluxrt keeps its own.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_hf():
    saved = []
    for name in ("transformers", "diffusers"):
        try:
            logging = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        saved.append((logging, logging.get_verbosity(), logging.is_progress_bar_enabled()))
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        yield
    finally:
        for logging, verbosity, bars in saved:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
