"""Column types that behave the same on MySQL 8, MariaDB 10.11 and SQLite."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import BigInteger, DateTime, Integer, String, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class ExactString(TypeDecorator[str]):
    """A VARCHAR compared byte for byte: no case folding and no trailing-space padding.

    ARCHITECTURE section 11 says SKUs, locations, references and keys are "stored and compared
    exactly as given". MySQL's default collations fold case, and even ``utf8mb4_bin`` is PAD SPACE
    (``'a' = 'a '``). So on MySQL the column gets a NO PAD binary collation: ``utf8mb4_0900_bin``
    on MySQL 8, ``utf8mb4_nopad_bin`` on MariaDB (which has no 0900 collations before 11.4).
    SQLite's default BINARY collation already compares exactly.
    """

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        length = cast(String, self.impl_instance).length
        if dialect.name == "mysql":
            collation = (
                "utf8mb4_nopad_bin" if getattr(dialect, "is_mariadb", False) else "utf8mb4_0900_bin"
            )
            return dialect.type_descriptor(
                mysql.VARCHAR(length, charset="utf8mb4", collation=collation)
            )
        return dialect.type_descriptor(String(length))


# Microsecond timestamps (ARCHITECTURE section 11: DATETIME(6)); naive values, always UTC.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

# 64-bit on MySQL; SQLite only auto-increments an INTEGER PRIMARY KEY column.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# A JSON document of any size: TEXT on SQLite, LONGTEXT on MySQL / MariaDB (TEXT stops at
# 64 KiB; a 500-line transfer's event is tens of KiB).
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
