"""SuperSimpleNet (Rolih, Fučka and Skočaj, ICPR 2024): a discriminative detector on pretrained features, trained
on anomalies made in feature space, and on labelled defects where a line has them."""

from __future__ import annotations

from adkit.plugin import hookimpl


@hookimpl
def register_detectors(register):
    from adkit_plugins.supersimplenet.detector import SuperSimpleNet

    register("supersimplenet", SuperSimpleNet,
             help="SuperSimpleNet (Rolih et al. 2024): feature-space synthetic anomalies, segmentation and "
                  "classification heads on pretrained features; learns from labelled defects when given")
