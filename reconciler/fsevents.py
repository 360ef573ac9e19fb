"""`--watch`'s file events: watchdog on the manifest's folder and the managed files' folders.

watchdog cannot watch a single file, so whole folders are watched and each event is handed
on as (src, dest, kind, folder gone) for the schedule to judge.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

log = logging.getLogger("reconciler.watch")

MAX_WATCHED_FOLDERS = 512  # inotify costs a thread per folder in watchdog; beyond this, resync covers

Sink = Callable[[str, str, str, bool], None]  # (src, dest, kind, a watched folder itself is gone)


class FolderWatches:
    """The folders watched, kept in step with the folders wanted. `sink` is called on
    watchdog's threads."""

    def __init__(self, sink: Sink, poll: bool = False):
        # watchdog (third-party: threads, inotify bindings) is imported when a watch starts,
        # not by every `reconcile` run that imports the CLI
        from watchdog.events import (
            DirDeletedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
        )
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        self.sink = sink
        self.observer = PollingObserver(timeout=1.0) if poll else Observer(timeout=5.0)
        # no open/read events: our own reads of certificates must not wake us
        self.kinds = [
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileClosedEvent,
            DirDeletedEvent,
            DirMovedEvent,
        ]
        self.watched: dict[str, tuple[object, int]] = {}  # folder -> (ObservedWatch, inode)
        self._too_many_logged = False

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        try:
            self.observer.stop()
        except Exception:  # stopping is best effort; we are exiting anyway
            pass

    def dispatch(self, event) -> None:
        """watchdog's handler interface."""
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(getattr(event, "dest_path", "") or "")
        gone = event.is_directory and event.event_type in ("deleted", "moved") and src in self.watched
        self.sink(src, dest, event.event_type, gone)

    def sync(self, first: set[str], rest: set[str]) -> set[str]:
        """Watch `first` (the manifest's folders) and `rest`, up to MAX_WATCHED_FOLDERS;
        stop watching a folder that was replaced. Returns the folders newly watched."""
        wanted = self._wanted(first, rest)
        inodes = {}
        for folder in wanted:
            try:
                inodes[folder] = os.stat(folder).st_ino
            except OSError:
                pass  # not there yet: the pass that creates it is followed by another sync
        for folder, (watch, ino) in list(self.watched.items()):
            if inodes.get(folder) != ino:
                try:
                    self.observer.unschedule(watch)
                except (KeyError, OSError):
                    pass
                del self.watched[folder]
        return {folder for folder, ino in inodes.items() if folder not in self.watched and self._watch(folder, ino)}

    def _wanted(self, first: set[str], rest: set[str]) -> list[str]:
        wanted = sorted(first) + sorted(rest - first)
        if len(wanted) > MAX_WATCHED_FOLDERS:
            if not self._too_many_logged:
                log.warning(
                    "managed files live in %d folders; watching %d of them, "
                    "the others are checked every resync (--resync)",
                    len(wanted),
                    MAX_WATCHED_FOLDERS,
                )
                self._too_many_logged = True
            wanted = wanted[:MAX_WATCHED_FOLDERS]
        return wanted

    def _watch(self, folder: str, ino: int) -> bool:
        try:
            watch = self.observer.schedule(self, folder, recursive=False, event_filter=self.kinds)
        except OSError as exc:
            why = exc.strerror or exc
            log.warning("cannot watch %s (%s); changes there are noticed at the next resync", folder, why)
            return False
        self.watched[folder] = (watch, ino)
        return True
