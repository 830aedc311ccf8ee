"""Client-level differential privacy for the aggregation (docs/design.md, "Differential privacy").

``clipping``: each update's L2 norm bounded by ``clip``; ``mechanism``: the Gaussian noise each
released aggregate gets, calibrated to the largest weight one client can carry in it;
``accountant``: ε at δ from opacus's accountants, composed round by round.
"""

from fedmoa.privacy.accountant import (
    PrivacyAccountant,
    noise_for_target,
    resolve_noise_multiplier,
)
from fedmoa.privacy.clipping import clip_update, update_norm
from fedmoa.privacy.config import PrivacyConfig
from fedmoa.privacy.mechanism import add_gaussian_noise, sensitivity

__all__ = [
    "PrivacyAccountant",
    "PrivacyConfig",
    "add_gaussian_noise",
    "clip_update",
    "noise_for_target",
    "resolve_noise_multiplier",
    "sensitivity",
    "update_norm",
]
