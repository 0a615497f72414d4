#  SPDX-License-Identifier: BSD-3-Clause
"""The NBD module's RPCs for SPDK's rpc.py (PyPI package `spdk`, console script `spdk-rpc`).

    PYTHONPATH=scripts spdk-rpc --plugin nbd_rpc_plugin bdev_nbd_create \\
        -b Src0 -u 'nbd://backup.example:10809/disk0' --read-only

Commands: bdev_nbd_create, bdev_nbd_delete (the NBD client bdev), and
nbd_server_start, nbd_server_stop, nbd_export_add, nbd_export_remove,
nbd_get_exports (the NBD server). As in SPDK's own rpc.py, a parameter is
sent only when it is given on the command line, so the target's defaults
apply otherwise. (SPDK's nbd_start_disk/nbd_stop_disk map a bdev to a kernel
/dev/nbdX; these are different methods.)
"""

import argparse

# The printers (silent under --dry-run), integer checks and parameter
# picking are the clone plugin's; both plugins live in scripts/, on the same PYTHONPATH.
from clone_rpc_plugin import _non_negative, _params, print_dict, print_json


def _positive(text):
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive: %s" % text)
    return value


def _call(client, method, **params):
    return client.call(method, {k: v for k, v in params.items() if v is not None})


def spdk_rpc_plugin_initialize(subparsers):

    def bdev_nbd_create(args):
        print_json(args, _call(args.client, 'bdev_nbd_create', **_params(
            args, 'name', 'uri', 'read_only', 'connections', 'block_size', 'connect_timeout_ms',
            'io_timeout_ms', 'reconnect_delay_ms', 'fast_io_fail_timeout_ms')))

    p = subparsers.add_parser('bdev_nbd_create',
                              help='Create a bdev backed by an NBD export (nbdkit, qemu-nbd, ...)')
    p.add_argument('-b', '--name', help='Name of the new bdev', required=True)
    p.add_argument('-u', '--uri', required=True,
                   help="NBD URI: nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH")
    p.add_argument('-r', '--read-only', action='store_true', default=None,
                   help='Never write to the export (also implied by a read-only export)')
    p.add_argument('-c', '--connections', type=_positive, metavar='N',
                   help='Connections to open when the server allows multi-conn (default 1)')
    p.add_argument('--block-size', type=_positive, metavar='BYTES',
                   help='Block size of the bdev: a power of two from 512 (default 512)')
    p.add_argument('--connect-timeout-ms', type=_positive, metavar='MS',
                   help='Connect and handshake timeout (default 5000)')
    p.add_argument('--io-timeout-ms', type=_non_negative, metavar='MS',
                   help='A request unanswered this long drops the connection (default 30000; 0 = never)')
    p.add_argument('--reconnect-delay-ms', type=_positive, metavar='MS',
                   help='First reconnect delay, doubled per failed attempt up to 10 s (default 1000)')
    p.add_argument('--fast-io-fail-timeout-ms', type=_non_negative, metavar='MS',
                   help='I/O waiting for a reconnect fails with EIO after this (default 10000)')
    p.set_defaults(func=bdev_nbd_create)

    def bdev_nbd_delete(args):
        print_json(args, _call(args.client, 'bdev_nbd_delete', name=args.name))

    p = subparsers.add_parser('bdev_nbd_delete', help='Delete an NBD client bdev')
    p.add_argument('-b', '--name', help='Name of the bdev', required=True)
    p.set_defaults(func=bdev_nbd_delete)

    def nbd_server_start(args):
        print_json(args, _call(args.client, 'nbd_server_start', listen=args.listen))

    p = subparsers.add_parser('nbd_server_start', help='Start serving NBD exports')
    p.add_argument('-l', '--listen', required=True,
                   help='HOST:PORT (10809 is the NBD port) or an absolute Unix socket path')
    p.set_defaults(func=nbd_server_start)

    def nbd_server_stop(args):
        print_json(args, _call(args.client, 'nbd_server_stop'))

    p = subparsers.add_parser('nbd_server_stop',
                              help='Stop listening and disconnect every NBD client (exports stay)')
    p.set_defaults(func=nbd_server_stop)

    def nbd_export_add(args):
        print_json(args, _call(args.client, 'nbd_export_add', bdev_name=args.bdev_name,
                               name=args.name, writable=args.writable))

    p = subparsers.add_parser('nbd_export_add', help='Export a bdev over NBD')
    p.add_argument('-b', '--bdev-name', required=True, help='The bdev to export')
    p.add_argument('-n', '--name', help='Export name (default: the bdev name)')
    p.add_argument('-w', '--writable', action='store_true', default=None,
                   help='Let clients write (default: read-only)')
    p.set_defaults(func=nbd_export_add)

    def nbd_export_remove(args):
        print_json(args, _call(args.client, 'nbd_export_remove', name=args.name))

    p = subparsers.add_parser('nbd_export_remove',
                              help='Remove an export (its clients are disconnected)')
    p.add_argument('-n', '--name', required=True, help='Export name')
    p.set_defaults(func=nbd_export_remove)

    def nbd_get_exports(args):
        print_dict(args, _call(args.client, 'nbd_get_exports', name=args.name))

    p = subparsers.add_parser('nbd_get_exports', help='List the listeners and exports')
    p.add_argument('-n', '--name', help='Only this export')
    p.set_defaults(func=nbd_get_exports)
