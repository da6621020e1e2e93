//! etcd: the client, the reflector that mirrors a prefix, the decoding of the record
//! prefixes shared by the proxy and the DNS, and service records' CRUD.

pub mod etcd;
pub mod keys;
pub mod records;
pub mod services;
