"""FedSR (Nguyen, Torr and Lim, NeurIPS 2022): FedAvg with a regularized stochastic representation.

The server averages the networks as FedAvg does and sends the two coefficients; each client
trains a Gaussian representation with an L2 penalty on its samples and a bound on the
conditional mutual information I(x; z | y), as described in ``client.fedsr``. Both sides build
the model with ``client.models.build_run_model``, which adds the representation's scale layer.
"""

from __future__ import annotations

import math
from typing import Any

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from client.fedsr import FEDSR_CMI_COEFF, FEDSR_L2_COEFF
from strategies.base import ValidatedStrategy


class FedSR(ValidatedStrategy, FlowerFedAvg):
    """FedAvg that sends FedSR's coefficients to the clients.

    Parameters
    ----------
    l2_coeff : float (default: 0.01)
        α_L2R ≥ 0, the weight of E‖z‖₂² (the authors' code default).
    cmi_coeff : float (default: 0.0005)
        α_CMI ≥ 0, the weight of the KL bound on I(x; z | y) (the authors' code default).
    **kwargs
        Flower FedAvg's sampling arguments.
    """

    def __init__(self, l2_coeff: float = 0.01, cmi_coeff: float = 5e-4, **kwargs: Any) -> None:
        for name, value in (("l2_coeff", l2_coeff), ("cmi_coeff", cmi_coeff)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"Invalid FedSR {name} = {value!r}: it must be a finite number >= 0.")
        super().__init__(**kwargs)
        self.l2_coeff = float(l2_coeff)
        self.cmi_coeff = float(cmi_coeff)

    def extra_train_config(self, server_round: int) -> dict[str, Any]:
        return {FEDSR_L2_COEFF: self.l2_coeff, FEDSR_CMI_COEFF: self.cmi_coeff}
