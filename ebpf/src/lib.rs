//! Exists so the agent can declare a build-dependency on this crate (cargo then rebuilds the
//! agent when the programs change); the programs themselves are the `sockmesh` binary target.
#![no_std]
