"""Use the ft_focal optimizers from trainers you already have.

- ``ft_focal.integrations.transformers``: ``SharpnessTrainer`` / ``SharpnessTrainerMixin`` for
  ``transformers.Trainer``.
- ``ft_focal.integrations.lightning``: ``SharpnessLightningMixin`` / ``sharpness_step`` for Lightning
  manual optimization (extra ``lightning``).

Import the submodule you need; this package imports neither transformers nor lightning, so
``import ft_focal.integrations`` stays cheap and works without the optional extras.
"""
