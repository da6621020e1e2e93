//! etcd: the client, the reflector that mirrors a prefix, and service records' CRUD.

pub mod etcd;
pub mod keys;
pub mod services;
