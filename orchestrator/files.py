"""Files that other commands read while a sweep writes them (``tracking.json``, ``plan.json``,
``placement.json``): written to a temporary name and renamed, so a reader sees the old file or
the new one, never half of one; logs and journals appended whole lines or nothing."""
import json
import os


def write_json_atomic(path, obj):
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path):
    """The complete records of a JSON-lines file another process may be appending to: a last
    line cut short by a crash or a write in progress is left out, not an error."""
    records = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith('\n'):
                    raise  # a broken line in the middle is damage, not a write in progress
                break
    return records


def append_whole(path, text, sync=False):
    """Append ``text`` or nothing: a write the disk cannot take (full) is cut back off, so the
    next append does not follow half a line. Unbuffered: a failed write is not retried when the
    file closes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        data = text.encode()
        try:
            while data:
                data = data[os.write(fd, data):]
            if sync:
                os.fsync(fd)
        except OSError:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)
