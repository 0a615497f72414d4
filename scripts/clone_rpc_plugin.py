#  SPDX-License-Identifier: BSD-3-Clause
"""The clone bdev's RPCs for SPDK's rpc.py (PyPI package `spdk`, console script `spdk-rpc`).

    PYTHONPATH=scripts spdk-rpc --plugin clone_rpc_plugin bdev_clone_create \\
        -b Clone0 -s Remote0 -d Dest0 -m Meta0 -r 64

Commands (rpc-contract.md section 2.7): bdev_clone_create, bdev_clone_delete,
bdev_clone_get_bdevs, bdev_clone_set_hydration. As in SPDK's own rpc.py, a
parameter is sent only when it is given on the command line (the client drops
None values), so the target's defaults apply otherwise.
"""

import argparse

from spdk.rpc import cmd_parser


def _printer(name):
    # rpc.py --dry-run silences the printers of its own command modules only;
    # do the same here so a dry run shows the request and nothing else.
    def show(args, result):
        if not getattr(args, 'dry_run', False):
            getattr(cmd_parser, name)(result)
    return show


print_json = _printer('print_json')
print_dict = _printer('print_dict')


def _non_negative(text):
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid integer: %r" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative: %s" % text)
    return value


def _params(args, *names):
    """The parameters `names` as given on the command line (None where not
    given: the client drops those)."""
    return {n: getattr(args, n) for n in names}


HYDRATION_TUNING = ('hydration_threshold', 'hydration_batch_size', 'hydration_mbytes_per_sec')


def _add_hydration_tuning(p):
    p.add_argument('--hydration-threshold', type=_non_negative, metavar='N',
                   help='Cap on regions copying at once (0 pauses background copying; default '
                        'no cap: the adaptive window sizes it from the source\'s measured rate '
                        'and latency; each reactor keeps at most 256 copies and 64 MiB of copy '
                        'buffers in flight)')
    p.add_argument('--hydration-batch-size', type=_non_negative, metavar='N',
                   help='Cap on contiguous regions per copy: 1 to 65536 (default 65536, no cap)')
    p.add_argument('--hydration-mbytes-per-sec', type=_non_negative, metavar='N',
                   help='Background copy rate limit in MiB/s: 0 (unlimited, the default) to 1048576')


def spdk_rpc_plugin_initialize(subparsers):

    def bdev_clone_create(args):
        print_json(args, args.client.bdev_clone_create(**_params(
            args, 'name', 'source_bdev_name', 'dest_bdev_name', 'metadata_bdev_name',
            'region_size_kb', 'no_hydration', 'no_discard_passdown', *HYDRATION_TUNING,
            'copy_on_read', 'uuid', 'force_format')))

    p = subparsers.add_parser('bdev_clone_create',
                              help='Create a clone bdev: a writable copy of a read-only source, '
                                   'usable at once, hydrated onto the destination in the background')
    p.add_argument('-b', '--name', help='Name of the clone bdev', required=True)
    p.add_argument('-s', '--source-bdev-name', help='Read-only origin (the slow or remote bdev)', required=True)
    p.add_argument('-d', '--dest-bdev-name', help='Destination bdev (at least as large as the source)',
                   required=True)
    p.add_argument('-m', '--metadata-bdev-name', help='Metadata bdev (region bitmap and superblock)',
                   required=True)
    p.add_argument('-r', '--region-size-kb', type=_non_negative, metavar='KB',
                   help='Region size in KiB: a power of two from 4 to 1048576 (default 4)')
    p.add_argument('--no-hydration', action='store_true', default=None,
                   help='Create with background hydration disabled (enable later with bdev_clone_set_hydration)')
    p.add_argument('--no-discard-passdown', action='store_true', default=None,
                   help='Do not pass discards of whole regions down to the destination')
    _add_hydration_tuning(p)
    p.add_argument('--copy-on-read', action='store_true', default=None,
                   help='Also write data read from the source to the destination')
    p.add_argument('-u', '--uuid', help='UUID of the clone bdev (default: the one in its metadata, '
                                        'or a random one when the metadata is formatted)')
    p.add_argument('--force-format', action='store_true', default=None,
                   help='Format the metadata even though it holds a clone or is damaged: every '
                        'region reads from the source again (the destination\'s data is dropped)')
    p.set_defaults(func=bdev_clone_create)

    def bdev_clone_delete(args):
        args.client.bdev_clone_delete(name=args.name)

    p = subparsers.add_parser('bdev_clone_delete', help='Delete a clone bdev (its base bdevs stay)')
    p.add_argument('name', help='Name of the clone bdev')
    p.set_defaults(func=bdev_clone_delete)

    def bdev_clone_get_bdevs(args):
        print_dict(args, args.client.bdev_clone_get_bdevs(name=args.name))

    p = subparsers.add_parser('bdev_clone_get_bdevs',
                              help='Show clone bdevs: state, hydration progress, errors, metadata')
    p.add_argument('-b', '--name', help='Name of one clone bdev (default: all)')
    p.set_defaults(func=bdev_clone_get_bdevs)

    def bdev_clone_set_hydration(args):
        args.client.bdev_clone_set_hydration(**_params(args, 'name', 'enable', *HYDRATION_TUNING))

    p = subparsers.add_parser('bdev_clone_set_hydration',
                              help="Change a clone's background hydration: enable, disable, tune")
    p.add_argument('-b', '--name', help='Name of the clone bdev', required=True)
    group = p.add_mutually_exclusive_group()
    group.add_argument('--enable', dest='enable', action='store_const', const=True,
                       help='Resume background hydration')
    group.add_argument('--disable', dest='enable', action='store_const', const=False,
                       help='Stop background hydration (user I/O still hydrates what it needs)')
    _add_hydration_tuning(p)
    p.set_defaults(func=bdev_clone_set_hydration, enable=None)
