"""A real Linux kernel initiator for the tests: one QEMU guest per session, many scenarios.

* :mod:`vm.harness` (host): finds or installs QEMU, the kernel and busybox, byte-compiles what
  the guest imports, boots the guest with a hard deadline and reads back what it reported.
* :mod:`vm.image` (host): the initramfs, static busybox plus the virtio and 9p modules and
  :file:`init`, the guest's first process, which mounts the host's ``/`` read-only as its root.
* :mod:`vm.protocol` (both sides): the files and JSON records exchanged in the work directory.
* :mod:`vm.guest_runner` (guest): the one Python process that starts udevd, iscsid and tgtd and
  runs the scenarios, reporting each as it ends.
* :mod:`vm.guest` (guest): daemons, commands with deadlines, polling, the scenario registry.
* :mod:`vm.scenarios` (guest): the scenarios; tests/test_vm_kernel.py asserts on their facts.
"""
