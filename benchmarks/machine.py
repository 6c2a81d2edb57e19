"""What a benchmark's JSON records of the machine it ran on (results are comparable within it)."""

import os
import platform


def machine_facts() -> dict:
    """CPU count, architecture, processor, TensorFlow version and the oneDNN setting."""
    import tensorflow as tf

    return dict(
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        processor=platform.processor(),
        tensorflow=tf.__version__,
        onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
    )
