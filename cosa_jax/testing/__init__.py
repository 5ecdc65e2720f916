"""Test doubles and fixtures. Production code never imports this package (tests/test_layout.py
checks); tests, the benchmarks and the demo start what they need themselves.

- ``scripted_server``  a scripted, fault-injecting OpenAI-compatible chat-completions server (no
                       model): ``FakeChatServer``, ``echo_reply``, ``ScriptedReplies``,
                       ``recognize_judge``
- ``instant_client``   ``InstantChatClient``: the production request path with an in-process reply
                       instead of HTTP (journal tests at 100k requests)
- ``model_fixtures``   tiny random Llama-3.1-style checkpoints written by transformers (needs the
                       ``test`` extra: torch)
- ``kill_points``      runs ``launch.train`` and SIGKILLs it at an exact point (checkpoint
                       save, old-step deletion, export)
- ``synth_fixtures``   a shipped synthesis config pointed at a test server; the category error
                       score written out independently
"""
