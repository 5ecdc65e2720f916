"""The paper's CoSApien evaluation: 5 human-written scenarios x 40 prompts from the hub (needs
network); helpfulness and compliance judged by GPT-4o. The in-context baseline uses the shipped
hand-written shots (``baseline.shots='mini'``) unless pointed at another shots file. Candidate,
judge and generation settings are CoSAlign-Test's (configs/eval_cosalign_test.py).

    python -m launch.evaluate --config configs/eval_cosapien.py
"""

from configs.eval_cosalign_test import get_config as cosalign_test_config


def get_config():
    c = cosalign_test_config()
    c.output_dir = "runs/eval_cosapien"
    c.dataset.update(name="cosapien", source="microsoft/CoSApien")
    c.baseline.shots = "mini"
    return c
