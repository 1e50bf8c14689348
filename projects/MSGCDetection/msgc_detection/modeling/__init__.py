"""Detection models: the MSGC FPN backbone and the detectors registered in ``DETECTOR_REGISTRY``."""
from .backbone import MSGCFPN, build_msgc_fpn, convert_frozen_batchnorm, freeze_stages
from .meta_arch import DETECTOR_REGISTRY, MSGCDetector, build_detector, mac_loss

__all__ = ["DETECTOR_REGISTRY", "MSGCDetector", "MSGCFPN", "build_detector", "build_msgc_fpn",
           "convert_frozen_batchnorm", "freeze_stages", "mac_loss"]
