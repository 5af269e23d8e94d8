"""What a simulated VM's configuration looks like: its devices and its ``extraConfig``,
shaped like a real Linux or Windows VM (docs/simulator-vms.md).

A real VM reports about fifteen devices (PCI, IDE, PS/2 and SIO controllers,
keyboard, pointing device, video card, VMCI, USB and SCSI controllers, CD-ROM,
disks, NICs) and fifty-odd ``extraConfig`` keys (what the vmx file holds: PCI
bridges, SVGA, tools and migration settings, NUMA sizing, file names; and the
``guestinfo.*`` keys VMware Tools publishes from a running guest). The
simulator's VMs carry the same, so that what a client reads of one costs what
it costs against vCenter.

The cost on the simulator's side stays low because most of it is shared:

- a :class:`Shape` per guest family holds the devices and keys every VM of that
  family has alike, built once as pyVmomi objects and shared by every VM, every
  clone and every reply (the serializer only reads them; nothing here or in the
  simulator mutates a reported value);
- what differs per VM (disks, NICs, file names, generation ids) is built on read
  from the VM's own state, so a clone costs nothing more to make and a VM holds
  no copy of its configuration;
- the shared objects are declared to the SOAP codec (``fleet.sim.soap.share``),
  which serializes each once and writes the same text into every reply.

Keys follow vSphere's numbering: controllers 100 (PCI), 200/201 (IDE), 300 (PS/2),
400 (SIO), 1000+bus (SCSI), 14000 (USB xHCI), 15000+bus (SATA); devices 500
(video), 600/700 (keyboard, mouse), 2000+16*bus+unit (SCSI disks), 3000+2*bus+unit
(IDE CD-ROM), 4000+n (NICs), 12000 (VMCI), 16000+30*bus+unit (SATA CD-ROM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pyVmomi import vim

from fleet.sim.soap import share

DEV = vim.vm.device
OptionValue = vim.option.OptionValue

PCI_KEY = 100
IDE_KEYS = (200, 201)
PS2_KEY = 300
SIO_KEY = 400
VIDEO_KEY = 500
KEYBOARD_KEY = 600
POINTING_KEY = 700
SCSI_KEY_BASE = 1000
DISK_KEY_BASE = 2000
IDE_CDROM_KEY = 3002  # IDE 1:0
NIC_KEY_BASE = 4000
VMCI_KEY = 12000
USB_XHCI_KEY = 14000
SATA_KEY = 15000
SATA_CDROM_KEY = 16000  # SATA 0:0

#: a SCSI controller's own unit; it holds units 0-15 but this one
SCSI_CONTROLLER_UNIT = 7
DISKS_PER_SCSI_CONTROLLER = 15
#: unit numbers on the PCI controller: the first SCSI controller, the first NIC
SCSI_PCI_UNIT = 3
NIC_PCI_UNIT = 7

#: VMware Tools 12.2.0 (major << 10 | minor << 5 | patch), as ``guest.toolsVersion`` says
TOOLS_VERSION = 12352
TOOLS_VERSION_STRING = "12.2.0"
TOOLS_BUILD = "21223074"
TOOLS_REQUIRED_VERSION = 12416

#: where vSphere puts NICs on the PCIe root ports: ethernet0, ethernet1, ...
NIC_PCI_SLOTS = (192, 1184, 2208, 3232, 224, 1216, 2240, 3264, 256, 1248)


def disk_key(index: int) -> int:
    """The key of a VM's ``index``-th disk (0-based): SCSI controllers take 15 disks
    each, on units 0-15 but 7 (the controller's own)."""
    bus, pos = divmod(index, DISKS_PER_SCSI_CONTROLLER)
    unit = pos if pos < SCSI_CONTROLLER_UNIT else pos + 1
    return DISK_KEY_BASE + 16 * bus + unit


def disk_place(key: int) -> tuple[int, int]:
    """(SCSI controller key, unit number) of the disk with ``key``."""
    bus, unit = divmod(key - DISK_KEY_BASE, 16)
    return SCSI_KEY_BASE + bus, unit


def nic_slot(index: int) -> int:
    return NIC_PCI_SLOTS[index % len(NIC_PCI_SLOTS)]


#: keys each VM computes for itself (see :func:`own_options`)
OWN_KEYS = frozenset({
    "nvram", "sched.swap.derivedName", "migrate.hostLog", "vmxstats.filename", "vm.genid",
    "vm.genidX", "numa.autosize.cookie", "numa.autosize.vcpu.maxPerVirtualNode",
    "scsi0.sasWWID",
})


@dataclass(frozen=True, eq=False)  # hashed by identity: the caches below key on it
class Shape:
    """What every VM of one guest family has alike (facts: docs/simulator-vms.md)."""

    family: str
    guest_id: str
    guest_full_name: str
    guest_family: str  # what VMware Tools reports as guest.guestFamily
    firmware: str
    scsi_type: Any
    scsi_summary: str
    nic_type: Any
    cdrom_on_sata: bool
    video_ram_kb: int
    #: vmx keys every VM of this shape carries with these values
    vmx: tuple[tuple[str, str], ...]
    #: guestinfo (and related) keys VMware Tools publishes once it runs in the guest
    tools: tuple[tuple[str, str], ...]
    #: every key this shape may report (vmx, per-VM and tools keys)
    keys: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        keys = {k for k, _ in self.vmx} | {k for k, _ in self.tools} | OWN_KEYS
        keys |= {f"ethernet{n}.pciSlotNumber" for n in range(len(NIC_PCI_SLOTS))}
        object.__setattr__(self, "keys", frozenset(keys))


_PCI_BRIDGES: tuple[tuple[str, str], ...] = (
    ("pciBridge0.present", "TRUE"),
    ("pciBridge0.pciSlotNumber", "17"),
    *(item for n, slot in ((4, 21), (5, 22), (6, 23), (7, 24)) for item in (
        (f"pciBridge{n}.present", "TRUE"),
        (f"pciBridge{n}.virtualDev", "pcieRootPort"),
        (f"pciBridge{n}.functions", "8"),
        (f"pciBridge{n}.pciSlotNumber", str(slot)),
    )),
)


def _common_vmx(vram_bytes: int) -> tuple[tuple[str, str], ...]:
    return (
        *_PCI_BRIDGES,
        ("svga.present", "TRUE"),
        ("svga.guestBackedPrimaryAware", "TRUE"),
        ("hpet0.present", "TRUE"),
        ("RemoteDisplay.maxConnections", "-1"),
        ("cpuid.coresPerSocket", "1"),
        ("sched.cpu.latencySensitivity", "normal"),
        ("monitor.phys_bits_used", "45"),
        ("softPowerOff", "FALSE"),
        ("tools.remindInstall", "FALSE"),
        ("migrate.hostLogState", "none"),
        ("migrate.migrationId", "0"),
        ("vmotion.checkpointFBSize", str(vram_bytes)),
        ("vmotion.checkpointSVGAPrimarySize", str(vram_bytes)),
        ("vmotion.svga.mobMaxSize", str(vram_bytes)),
        ("vmotion.svga.graphicsMemoryKB", str(vram_bytes // 1024)),
        ("scsi0.pciSlotNumber", "160"),
        ("usb_xhci.pciSlotNumber", "224"),
        ("usb_xhci:4.present", "TRUE"),
        ("usb_xhci:4.deviceType", "hid"),
        ("usb_xhci:4.port", "4"),
        ("usb_xhci:4.parent", "-1"),
    )


def _tools_common(description: str, detailed: str) -> tuple[tuple[str, str], ...]:
    return (
        ("guestinfo.vmtools.buildNumber", TOOLS_BUILD),
        ("guestinfo.vmtools.description", f"{description} {TOOLS_VERSION_STRING} build "
                                          f"{TOOLS_BUILD}"),
        ("guestinfo.vmtools.versionNumber", str(TOOLS_VERSION)),
        ("guestinfo.vmtools.versionString", TOOLS_VERSION_STRING),
        ("guestinfo.vmware.components.available", "none"),
        ("guestInfo.detailed.data", detailed),
        ("vmware.tools.internalversion", str(TOOLS_VERSION)),
        ("vmware.tools.requiredversion", str(TOOLS_REQUIRED_VERSION)),
    )


_LINUX: dict[str, Any] = dict(
    family="linux", guest_id="ubuntu64Guest", guest_full_name="Ubuntu Linux (64-bit)",
    guest_family="linuxGuest", firmware="bios",
    scsi_type=DEV.ParaVirtualSCSIController, scsi_summary="VMware paravirtual SCSI",
    nic_type=DEV.VirtualVmxnet3, cdrom_on_sata=False, video_ram_kb=4096,
    vmx=(*_common_vmx(4 * 1024 * 1024), ("vmci0.pciSlotNumber", "32")),
    tools=_tools_common(
        "open-vm-tools",
        "architecture='X86' bitness='64' distroAddlVersion='22.04.4 LTS (Jammy Jellyfish)' "
        "distroName='Ubuntu' distroVersion='22.04' familyName='Linux' "
        "kernelVersion='5.15.0-105-generic' prettyName='Ubuntu 22.04.4 LTS'"),
)
LINUX = Shape(**_LINUX)

WINDOWS = Shape(
    family="windows", guest_id="windows2019srv_64Guest",
    guest_full_name="Microsoft Windows Server 2019 (64-bit)", guest_family="windowsGuest",
    firmware="efi", scsi_type=DEV.VirtualLsiLogicSASController, scsi_summary="LSI Logic SAS",
    nic_type=DEV.VirtualE1000e, cdrom_on_sata=True, video_ram_kb=8192,
    vmx=(*_common_vmx(8 * 1024 * 1024),
         ("sata0.pciSlotNumber", "32"),
         ("tools.guest.desktop.autolock", "TRUE"),
         ("toolsInstallManager.updateCounter", "1"),
         ("toolsInstallManager.lastInstallError", "0")),
    tools=(*_tools_common(
        "VMware Tools",
        "architecture='X86' bitness='64' buildNumber='17763' distroName='Windows' "
        "distroVersion='10.0' familyName='Windows' kernelVersion='17763.5576' "
        "prettyName='Windows Server 2019, 64-bit (Build 17763.5576)'"),
        ("guestinfo.driver.vmci.version", "9.8.18.0"),
        ("guestinfo.driver.vsock.version", "9.8.19.0"),
        ("guestinfo.driver.wddm.version", "9.17.04.0002"),
        ("guestinfo.driver.efifw.version", "1.0.0.0")),
)

#: a guest fleet has no network recipe for: FreeBSD, built like the Linux VM
OTHER = Shape(**{**_LINUX, "family": "other", "guest_id": "freebsd13_64Guest",
                  "guest_full_name": "FreeBSD 13 (64-bit)", "guest_family": "otherGuestFamily",
                  "tools": _tools_common(
                      "open-vm-tools",
                      "architecture='X86' bitness='64' distroName='FreeBSD' "
                      "distroVersion='13.2-RELEASE' familyName='FreeBSD' "
                      "kernelVersion='13.2-RELEASE' prettyName='FreeBSD 13.2-RELEASE'")})

SHAPES = {shape.family: shape for shape in (LINUX, WINDOWS, OTHER)}


def shape_for(family: str) -> Shape:
    """The shape of a VM whose guest is ``family`` (Linux for anything unknown)."""
    return SHAPES.get(family, LINUX)


# -- devices -------------------------------------------------------------------------

def _info(label: str, summary: str | None = None) -> Any:
    return vim.Description(label=label, summary=label if summary is None else summary)


def _slot(number: int) -> Any:
    return DEV.VirtualDevice.PciBusSlotInfo(pciSlotNumber=number)


NORMAL_DISK_SHARES = vim.SharesInfo(shares=1000, level="normal")
DISK_IO = vim.StorageResourceManager.IOAllocationInfo(limit=-1, reservation=0,
                                                      shares=NORMAL_DISK_SHARES)
NIC_ALLOCATION = DEV.VirtualEthernetCard.ResourceAllocation(
    reservation=0, limit=-1, share=vim.SharesInfo(shares=50, level="normal"))
share(NORMAL_DISK_SHARES, DISK_IO, NIC_ALLOCATION)


@lru_cache(maxsize=256)
def static_devices(shape: Shape, disks: int, nics: int) -> tuple[Any, ...]:
    """The devices of a VM of ``shape`` with ``disks`` disks and ``nics`` NICs that are
    the same for every such VM (all but the disks and NICs), in vCenter's order."""
    scsi_count = max(1, -(-disks // DISKS_PER_SCSI_CONTROLLER))
    disk_keys = [disk_key(d) for d in range(disks)]
    nic_keys = [NIC_KEY_BASE + n for n in range(nics)]
    cdrom_key = SATA_CDROM_KEY if shape.cdrom_on_sata else IDE_CDROM_KEY
    pci_devices = [VIDEO_KEY, VMCI_KEY, USB_XHCI_KEY]
    if shape.cdrom_on_sata:
        pci_devices.append(SATA_KEY)
    pci_devices += [SCSI_KEY_BASE + b for b in range(scsi_count)] + nic_keys
    devices: list[Any] = [
        DEV.VirtualIDEController(key=IDE_KEYS[0], deviceInfo=_info("IDE 0"), controllerKey=0,
                                 busNumber=0),
        DEV.VirtualIDEController(key=IDE_KEYS[1], deviceInfo=_info("IDE 1"), controllerKey=0,
                                 busNumber=1,
                                 device=[] if shape.cdrom_on_sata else [cdrom_key]),
        DEV.VirtualPS2Controller(key=PS2_KEY, deviceInfo=_info("PS2 controller 0"),
                                 controllerKey=0, busNumber=0,
                                 device=[KEYBOARD_KEY, POINTING_KEY]),
        DEV.VirtualPCIController(key=PCI_KEY, deviceInfo=_info("PCI controller 0"),
                                 controllerKey=0, busNumber=0, device=pci_devices),
        DEV.VirtualSIOController(key=SIO_KEY, deviceInfo=_info("SIO controller 0"),
                                 controllerKey=0, busNumber=0),
        DEV.VirtualKeyboard(key=KEYBOARD_KEY, deviceInfo=_info("Keyboard", "Keyboard"),
                            controllerKey=PS2_KEY, unitNumber=0),
        DEV.VirtualPointingDevice(
            key=POINTING_KEY, deviceInfo=_info("Pointing device", "Pointing device; Device"),
            backing=DEV.VirtualPointingDevice.DeviceBackingInfo(
                deviceName="", useAutoDetect=False, hostPointingDevice="autodetect"),
            controllerKey=PS2_KEY, unitNumber=1),
        DEV.VirtualVideoCard(
            key=VIDEO_KEY, deviceInfo=_info("Video card", "Video card"),
            controllerKey=PCI_KEY, unitNumber=0, videoRamSizeInKB=shape.video_ram_kb,
            numDisplays=1, useAutoDetect=False, enable3DSupport=False,
            use3dRenderer="automatic", graphicsMemorySizeInKB=262144),
        DEV.VirtualVMCIDevice(
            key=VMCI_KEY, deviceInfo=_info(
                "VMCI device", "Device on the virtual machine PCI bus that provides support "
                               "for the virtual machine communication interface"),
            slotInfo=None if shape.cdrom_on_sata else _slot(32),
            controllerKey=PCI_KEY, unitNumber=17, id=-1,
            allowUnrestrictedCommunication=False, filterEnable=True),
        DEV.VirtualUSBXHCIController(
            key=USB_XHCI_KEY, deviceInfo=_info("USB xHCI controller", "USB xHCI controller"),
            slotInfo=_slot(224), controllerKey=PCI_KEY, unitNumber=23, busNumber=0,
            autoConnectDevices=False),
    ]
    if shape.cdrom_on_sata:
        devices.append(DEV.VirtualAHCIController(
            key=SATA_KEY, deviceInfo=_info("SATA controller 0", "AHCI"), slotInfo=_slot(32),
            controllerKey=PCI_KEY, unitNumber=24, busNumber=0, device=[cdrom_key]))
    for bus in range(scsi_count):
        devices.append(shape.scsi_type(
            key=SCSI_KEY_BASE + bus, deviceInfo=_info(f"SCSI controller {bus}",
                                                      shape.scsi_summary),
            slotInfo=_slot(160 + 32 * bus), controllerKey=PCI_KEY,
            unitNumber=SCSI_PCI_UNIT + bus, busNumber=bus,
            device=[k for k in disk_keys if disk_place(k)[0] == SCSI_KEY_BASE + bus],
            hotAddRemove=True, sharedBus="noSharing", scsiCtlrUnitNumber=SCSI_CONTROLLER_UNIT))
    devices.append(DEV.VirtualCdrom(
        key=cdrom_key, deviceInfo=_info("CD/DVD drive 1", "Remote device"),
        backing=DEV.VirtualCdrom.RemotePassthroughBackingInfo(
            deviceName="", useAutoDetect=False, exclusive=False),
        connectable=DEV.VirtualDevice.ConnectInfo(startConnected=False, allowGuestControl=True,
                                                  connected=False, status="untried"),
        controllerKey=SATA_KEY if shape.cdrom_on_sata else IDE_KEYS[1], unitNumber=0))
    share(*devices)
    return tuple(devices)


@lru_cache(maxsize=256)
def static_by_key(shape: Shape, disks: int, nics: int) -> dict[int, Any]:
    return {int(d.key): d for d in static_devices(shape, disks, nics)}


@lru_cache(maxsize=4096)
def disk_info(index: int, capacity_kb: int) -> Any:
    info = _info(f"Hard disk {index + 1}", f"{capacity_kb:,} KB")
    share(info)
    return info


@lru_cache(maxsize=1024)
def _slot_cached(number: int) -> Any:
    slot = _slot(number)
    share(slot)
    return slot


def nic_slot_info(index: int) -> Any:
    return _slot_cached(nic_slot(index))


# -- extraConfig -----------------------------------------------------------------------

@lru_cache(maxsize=64)
def vmx_options(shape: Shape, nics: int) -> tuple[Any, ...]:
    """The OptionValues every VM of ``shape`` with ``nics`` NICs reports alike."""
    items = [*shape.vmx, *((f"ethernet{n}.pciSlotNumber", str(nic_slot(n)))
                           for n in range(nics))]
    options = tuple(OptionValue(key=k, value=v) for k, v in items)
    share(*options)
    return options


@lru_cache(maxsize=8)
def tools_options(shape: Shape) -> tuple[Any, ...]:
    options = tuple(OptionValue(key=k, value=v) for k, v in shape.tools)
    share(*options)
    return options


def own_options(shape: Shape, *, name: str, instance_uuid: str, datastore_url: str,
                num_cpu: int) -> list[tuple[str, str]]:
    """The vmx keys that are the VM's own: its file names (from its name, as the
    simulator names its files), generation ids and swap-file suffix (from its instance
    UUID, so they are stable and differ per VM), NUMA sizing (from its vCPUs)."""
    hexa = instance_uuid.replace("-", "")
    folder = datastore_url.removeprefix("ds://")
    out = [
        ("nvram", f"{name}.nvram"),
        ("sched.swap.derivedName", f"{folder}{name}/{name}-{hexa[:8]}.vswp"),
        ("migrate.hostLog", f"{name}-{hexa[8:16]}.hlog"),
        ("vmxstats.filename", f"{name}.scoreboard"),
        ("vm.genid", str(_signed64(hexa[:16]))),
        ("vm.genidX", str(_signed64(hexa[16:32]))),
        ("numa.autosize.cookie", str(num_cpu * 10000 + 12)),
        ("numa.autosize.vcpu.maxPerVirtualNode", str(num_cpu)),
    ]
    if shape.scsi_type is DEV.VirtualLsiLogicSASController:
        wwid = "5005056" + hexa[16:24] + "0"
        out.append(("scsi0.sasWWID", " ".join(wwid[i:i + 2] for i in range(0, 16, 2))))
    return out


def _signed64(hexa: str) -> int:
    value = int(hexa, 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def disk_uuid(instance_uuid: str, key: int) -> str:
    """A disk's UUID as vSphere writes it (``6000C29...``), stable per VM and disk."""
    hexa = instance_uuid.replace("-", "")
    return f"6000C29{hexa[0]}-{hexa[8:12]}-{hexa[12:16]}-{key:04x}-{hexa[20:32]}"


__all__ = [
    "DISK_KEY_BASE", "LINUX", "NIC_KEY_BASE", "OTHER", "OWN_KEYS", "SHAPES", "TOOLS_VERSION",
    "WINDOWS", "Shape", "disk_info", "disk_key", "disk_place", "disk_uuid",
    "nic_slot_info", "own_options", "shape_for", "static_by_key", "static_devices",
    "tools_options", "vmx_options",
]
