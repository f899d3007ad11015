"""The ``exo`` program: ``exo status``, ``exo place`` and ``exo chat`` talk to a running node
(:mod:`exo.cli`); anything else runs a node (:mod:`exo.main`). The node's modules are
imported only when a node runs, so the client commands start in about half the time."""

import sys

from exo import cli


def main() -> None:
    words = sys.argv[1:]
    if words and words[0] in cli.COMMANDS:
        cli.main(words)
    from exo.main import main as run_node_command  # the node's imports, only for a node

    run_node_command()


if __name__ == "__main__":
    main()
