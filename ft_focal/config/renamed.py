"""Recipe keys that were renamed: a recipe or an override with an old name still loads, with one
deprecation line; the old and the new name together are refused (they are one key)."""
from __future__ import annotations

import logging

from ft_focal.errors import UserError

logger = logging.getLogger(__name__)

#: Keys that were renamed: old -> new. The old name still works, with one deprecation line.
RENAMED_KEYS = {"optim.single_backward": "optim.one_backward"}


def renamed_section(section: str, values: dict) -> dict:
    """``values`` with every old key of RENAMED_KEYS under its new name (one warning line each)."""
    out = dict(values)
    for old, new in RENAMED_KEYS.items():
        old_section, old_key = old.split(".", 1)
        if old_section != section or old_key not in out:
            continue
        new_key = new.split(".", 1)[1]
        if new_key in out:
            raise UserError(f"recipe keys '{old}' and '{new}' are the same key (renamed): keep '{new}' only")
        logger.warning("recipe key '%s' is now '%s'; the old name still works but will be removed", old, new)
        out = {new_key if k == old_key else k: v for k, v in out.items()}
    return out


def renamed_override(text: str) -> str:
    """A `key=value` override with an old key of RENAMED_KEYS under its new name (one warning line)."""
    key, sep, value = text.partition("=")
    new = RENAMED_KEYS.get(key.strip())
    if not sep or new is None:
        return text
    logger.warning("recipe key '%s' is now '%s'; the old name still works but will be removed", key.strip(), new)
    return f"{new}={value}"
