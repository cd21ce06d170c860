"""The models, one file each: :mod:`moegate.models.dact` (the DACT router model and its exact early exit)
and :mod:`moegate.models.backbone` (the backbone classifier and its ``backbone/`` directory).

:mod:`moegate.router` is the public API that saves and loads a trained router (``Router.from_pretrained``).
"""
