"""Watchtower inside the training loops users already run: Hugging Face `Trainer` and Lightning.

    from watchtower.integrations.transformers import watch          # pip install 'watchtower[transformers]'
    watch(trainer)
    from watchtower.integrations.lightning import WatchtowerCallback  # pip install 'watchtower[lightning]'
    Trainer(callbacks=[WatchtowerCallback()])

Each module imports its framework; nothing else in Watchtower imports this package, so the core
never needs either (a test checks it in a fresh interpreter). Both feed the same `Monitor` the
bundled trainer uses, through `step_feed.StepFeed`, and so export the same metrics.
"""
