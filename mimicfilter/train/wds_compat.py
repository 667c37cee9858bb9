"""A fix for open_clip_train's WebDataset reader under webdataset >= 0.2.96 (this project installs 1.x).

webdataset's ``tar_file_expander`` now yields an empty end-of-shard marker that open_clip_train's
``group_by_keys_nothrow`` cannot read (``KeyError: 'fname'`` at the end of the first shard;
mlfoundations/open_clip#935, webdataset/webdataset#384). The fix upstream suggests is to ask for no
marker (``eof_value=None``). This module-level function replaces open_clip_train's
``tarfile_to_samples_nothrow`` for the run; DataLoader workers import it by name.
"""

from __future__ import annotations

import inspect


def tarfile_to_samples_nothrow(src, handler=None):
    from open_clip_train.data import group_by_keys_nothrow, log_and_continue
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or log_and_continue
    streams = url_opener(src, handler=handler)
    files = tar_file_expander(streams, handler=handler, **no_end_marker())
    return group_by_keys_nothrow(files, handler=handler)


def no_end_marker() -> dict:
    from webdataset.tariterators import tar_file_expander

    return {"eof_value": None} if "eof_value" in inspect.signature(tar_file_expander).parameters else {}


def needs_fix() -> bool:
    """True when the installed webdataset emits end-of-shard markers open_clip_train cannot read."""
    return bool(no_end_marker())
