"""What the examples of ``docs/*.md`` take for granted: an application's models and objects.

The pages show fragments of an application (``User``, ``Order``, a ``session``
...), as documentation does. :func:`docs_namespace` builds that application for
real, on SQLite files in the current directory (``app.db``, the URL the pages
use), so that ``tests/test_docs.py`` can run every example as written.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, ForeignKey, String, Table, create_engine, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import sqla_cachelayer as scl

__all__ = ["docs_namespace"]


class Base(DeclarativeBase):
    pass


user_keywords = Table(
    "user_keywords",
    Base.metadata,
    Column("user_id", ForeignKey("users.id"), primary_key=True),
    Column("keyword_id", ForeignKey("keywords.id"), primary_key=True),
)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), index=True)
    addresses: Mapped[list[Address]] = relationship(back_populates="user")
    keywords: Mapped[list[Keyword]] = relationship(secondary=user_keywords)


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    email: Mapped[str] = mapped_column(String(100))
    user: Mapped[User] = relationship(back_populates="addresses")


class Keyword(Base):
    __tablename__ = "keywords"
    id: Mapped[int] = mapped_column(primary_key=True)
    word: Mapped[str] = mapped_column(String(50))


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="paid")
    items: Mapped[list[OrderItem]] = relationship(back_populates="order")


class OrderItem(Base):
    __tablename__ = "order_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), index=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    quantity: Mapped[int] = mapped_column(default=1)
    order: Mapped[Order] = relationship(back_populates="items")


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    category_id: Mapped[int] = mapped_column(index=True, default=1)
    price_cents: Mapped[int] = mapped_column(default=100)


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(50))


class Balance(Base):
    __tablename__ = "balances"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    cents: Mapped[int] = mapped_column(default=0)


class Counter(Base):
    __tablename__ = "counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(default=0)


#: the classes a page may name without defining them
MODELS = (User, Address, Keyword, Customer, Order, OrderItem, Product, Account, Balance, Counter)


def _seed(session: Session) -> None:
    ed = User(id=1, name="ed", addresses=[Address(id=1, email="ed@example.com")])
    session.add_all(
        [
            ed,
            User(id=2, name="wendy"),
            Customer(id=7, name="Ann"),
            Product(id=1, name="lamp"),
            Order(id=1, customer_id=7, items=[OrderItem(id=1, product_id=1, quantity=2)]),
            Account(id=1, owner="ed"),
            Balance(id=1, account_id=1, cents=500),
            Counter(id=1, value=0),
        ]
    )


def docs_namespace() -> dict[str, Any]:
    """The globals a page's examples run in; call with the current directory set to
    a fresh temporary one (the pages' ``sqlite:///app.db`` is created there)."""
    settings = {
        "sqlalchemy.url": "sqlite:///app.db",
        "cachelayer.regions.default.backend": "sqla_cachelayer.memory",
        "cachelayer.regions.default.expiration_time": "300",
    }
    engine = scl.engine_from_config(settings)
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        _seed(s)
    layer = scl.CacheLayer.from_settings(settings)
    factory = layer.install(sessionmaker(engine))
    namespace: dict[str, Any] = {model.__name__: model for model in MODELS}
    namespace.update(
        __name__="docs_example",
        scl=scl,
        select=select,
        create_engine=create_engine,
        REPLICA_URL="sqlite:///app.db",  # a replica of app.db: the same file will do
        selectinload=selectinload,
        sessionmaker=sessionmaker,
        settings=settings,
        engine=engine,
        layer=layer,
        Session=factory,
        session=factory(),
    )
    return namespace
