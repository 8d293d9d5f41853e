"""The models, by name: the registry (registry: ModelSpec, MODELS, create_model), the networks (resnet,
wide_resnet, small_cnn) and transfer learning from pretrained weights (transfer). Ray never enters here."""

# Importing the model modules registers their models in registry.MODELS.
from raydist.models import resnet, small_cnn, wide_resnet  # noqa: F401
