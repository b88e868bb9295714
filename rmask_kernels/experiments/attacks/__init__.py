"""Adversarial attacks for the paper's transfer experiments, hand-written in PyTorch.

Conventions (shared with the rest of rmask_kernels.experiments):

- Models take images in [0, 1] pixel space, shape [N, C, H, W] (normalization is a layer
  inside the model), and return logits.
- The attack functions take ``eps`` and ``step`` in [0, 1] pixel units (8/255, not 8).
  :class:`AttackSpec` holds the paper's /255 units and converts when it runs.
- Attacks are untargeted; outputs are clipped to [0, 1] and stay within ``eps`` (L-inf)
  of the input. Each attack runs the model in eval mode and restores every module's
  training flag afterwards; gradients are taken w.r.t. the input only, so nothing
  accumulates in the parameters' ``.grad``.

One module per concern, their public names all importable from here:

- `gradient`: the gradient attacks :func:`fgsm`, :func:`pgd`, :func:`mi_fgsm`, :func:`cw_l2`
  and :class:`Ensemble`;
- `spec`: :class:`AttackSpec` in the paper's units, :func:`parse_attack`,
  :func:`attacks_by_name` and the paper's grid :data:`PAPER_GRID`;
- `crafting`: :func:`craft`, the transfer protocol's examples made on a source model;
- `saved`: the file they are stored in, :func:`save_adversarial` / :func:`load_adversarial`;
- `decision`: the decision-based attacks through foolbox (optional extra),
  :func:`boundary_attack` and :func:`hop_skip_jump`;
- `inputs`: the argument checks they share.
"""

from .crafting import craft
from .decision import DecisionAttackResult, boundary_attack, hop_skip_jump
from .gradient import Ensemble, cw_l2, fgsm, mi_fgsm, pgd
from .saved import AdversarialFileError, index_csv_path, load_adversarial, save_adversarial
from .spec import PAPER_GRID, AttackSpec, AttackSpecError, attacks_by_name, parse_attack

__all__ = [
    "AdversarialFileError",
    "AttackSpec",
    "AttackSpecError",
    "DecisionAttackResult",
    "Ensemble",
    "PAPER_GRID",
    "attacks_by_name",
    "boundary_attack",
    "craft",
    "cw_l2",
    "fgsm",
    "hop_skip_jump",
    "index_csv_path",
    "load_adversarial",
    "mi_fgsm",
    "parse_attack",
    "pgd",
    "save_adversarial",
]
