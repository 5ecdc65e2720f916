"""The server's settings (cosa_jax/inference/serve_config.py); override any key on the line:

    python -m launch.serve --config.model=embedded:smollm2-135m-instruct --config.served_model_name=cosa

A policy gateway in front of another OpenAI-compatible server instead of a model:

    python -m launch.serve --config.upstream=http://127.0.0.1:8001/v1
"""

from cosa_jax.inference.serve_config import default_config


def get_config():
    return default_config()
