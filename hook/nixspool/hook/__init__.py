"""The post-build-hook's side of nixspool: what runs on every build.

Standard library only, and cheap to import (a test checks both): Nix runs the
hook as root, synchronously, after every build. `main` is the hook; the others
are what it shares with `nixspool`: the rows it writes (`rows`), what a store
path is (`storepath`), where the config and spool are (`locate`), the fallback
journal (`journal`), and opening files in a directory someone else owns
(`files`). Nothing here imports from the command's side.
"""
