"""A real Xen 4.17 host nested under QEMU: kit builder and host driver.

See :mod:`sanvisor.xenhost.channel` for the dom0 command protocol.
"""

from sanvisor.xenhost.build import XenKit, build_xen_kit
from sanvisor.xenhost.host import XenHost, pv_config
from sanvisor.xenhost.packages import XenHostError

__all__ = ["XenHost", "XenHostError", "XenKit", "build_xen_kit", "pv_config"]
