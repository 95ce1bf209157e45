"""The schema the cache tests share: plain, one-to-many, many-to-many, inheritance."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, ForeignKey, Integer, String, Table
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, reconstructor, relationship


class Base(DeclarativeBase):
    pass


user_keywords = Table(
    "user_keywords",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("keyword_id", ForeignKey("keywords.id"), primary_key=True),
)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    score: Mapped[int] = mapped_column(default=0)
    addresses: Mapped[list[Address]] = relationship(
        back_populates="user", order_by="Address.id", cascade="all, delete-orphan"
    )
    keywords: Mapped[list[Keyword]] = relationship(secondary=user_keywords, order_by="Keyword.id")

    @reconstructor
    def _on_load(self) -> None:
        self.loaded_by_orm = True


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    user: Mapped[User] = relationship(back_populates="addresses")


class Keyword(Base):
    __tablename__ = "keywords"
    id: Mapped[int] = mapped_column(primary_key=True)
    word: Mapped[str] = mapped_column(String(50))


class Employee(Base):
    __tablename__ = "employees"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    type: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "managers"
    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    budget: Mapped[int] = mapped_column(Integer, default=0)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Doc(Base):
    """Mutable values (JSON): a hit must never hand out a shared one."""

    __tablename__ = "docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Counter(Base):
    __tablename__ = "counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


def seed(session_factory) -> None:  # type: ignore[no-untyped-def]
    with session_factory() as s:
        kws = [Keyword(id=i, word=f"k{i}") for i in range(1, 4)]
        for i in range(1, 6):
            u = User(id=i, name=f"user{i}", score=i * 10)
            u.addresses = [Address(id=i * 10 + j, email=f"u{i}-{j}@x.org") for j in range(2)]
            u.keywords = kws[: (i % 3) + 1]
            s.add(u)
        s.add_all([Employee(id=1, name="emp"), Manager(id=2, name="boss", budget=100)])
        s.add(Counter(id=1, value=0))
        s.add(Doc(id=1, data={"tags": ["a"], "n": 1}))
        s.commit()
