//! The guest's side of the API server the host runs for [`super::Kube`] cases: where the
//! kubeconfigs are, an admin client, and creating or patching objects from JSON.

use std::time::{Duration, Instant};

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::Value;

use super::CaseError;

/// Where the host puts the kubeconfigs and the CA in the guest.
const DIR: &str = "/ferrovip/kube";

/// The API server's CA certificate in the guest.
pub fn ca() -> String {
    format!("{DIR}/ca.crt")
}

/// The admin (`system:masters`) kubeconfig in the guest.
pub fn admin_kubeconfig() -> String {
    format!("{DIR}/admin.kubeconfig")
}

/// Node `node`'s kubeconfig (user `ferrovip:<node>`, bound to the agent's ClusterRole).
pub fn node_kubeconfig(node: &str) -> String {
    format!("{DIR}/{node}.kubeconfig")
}

/// Runs `f` to completion on a runtime of its own.
pub fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// An admin client of the host's API server, with a runtime to drive it.
pub struct Admin {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl Admin {
    pub fn connect() -> Result<Admin, CaseError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime.block_on(async {
            let kubeconfig = Kubeconfig::read_from(admin_kubeconfig())?;
            let config =
                Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
            Ok::<_, CaseError>(Client::try_from(config)?)
        })?;
        Ok(Admin { runtime, client })
    }

    /// The API of `doc`'s kind, in its namespace if it has one.
    fn api_of(&self, doc: &Value) -> Result<(Api<DynamicObject>, String), CaseError> {
        let api_version = doc["apiVersion"].as_str().ok_or("no apiVersion")?;
        let kind = doc["kind"].as_str().ok_or("no kind")?;
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let name = doc["metadata"]["name"]
            .as_str()
            .ok_or("no metadata.name")?
            .to_owned();
        let api = match doc["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        Ok((api, name))
    }

    /// Creates `doc` (status included where the resource keeps it on create, as for Nodes).
    pub fn create(&self, doc: &Value) -> Result<(), CaseError> {
        let (api, _) = self.api_of(doc)?;
        let object: DynamicObject = serde_json::from_value(doc.clone())?;
        self.runtime
            .block_on(api.create(&PostParams::default(), &object))?;
        Ok(())
    }

    /// [`Admin::create`], unless the object exists already (left by an earlier case).
    pub fn create_if_absent(&self, doc: &Value) -> Result<(), CaseError> {
        if self.get(doc)?.is_none() {
            self.create(doc)?;
        }
        Ok(())
    }

    /// Deletes the object `doc` names; absent is fine.
    pub fn delete(&self, doc: &Value) -> Result<(), CaseError> {
        let (api, name) = self.api_of(doc)?;
        match self
            .runtime
            .block_on(api.delete(&name, &DeleteParams::default()))
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Server-side apply of `doc` (creates or updates it).
    pub fn apply(&self, doc: &Value) -> Result<(), CaseError> {
        let (api, name) = self.api_of(doc)?;
        let params = PatchParams::apply("ferrovip-vm-test").force();
        self.runtime
            .block_on(api.patch(&name, &params, &Patch::Apply(doc)))?;
        Ok(())
    }

    /// A merge patch on the object `doc` names.
    pub fn merge_patch(&self, doc: &Value, patch: &Value) -> Result<(), CaseError> {
        let (api, name) = self.api_of(doc)?;
        self.runtime
            .block_on(api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)))?;
        Ok(())
    }

    /// A merge patch of the status subresource of the object `doc` names.
    pub fn merge_patch_status(&self, doc: &Value, patch: &Value) -> Result<(), CaseError> {
        let (api, name) = self.api_of(doc)?;
        self.runtime.block_on(api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(patch),
        ))?;
        Ok(())
    }

    /// The object `doc` names, as JSON (`None` when it does not exist).
    pub fn get(&self, doc: &Value) -> Result<Option<Value>, CaseError> {
        let (api, name) = self.api_of(doc)?;
        let object = self.runtime.block_on(api.get_opt(&name))?;
        Ok(object.map(serde_json::to_value).transpose()?)
    }

    /// Polls the object `doc` names until `pred` holds; returns it.
    pub fn wait(
        &self,
        doc: &Value,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, CaseError> {
        let started = Instant::now();
        loop {
            let object = self.get(doc)?.unwrap_or(Value::Null);
            if pred(&object) {
                return Ok(object);
            }
            if started.elapsed() >= timeout {
                return Err(format!(
                    "{what} not seen within {timeout:?}; last:\n{}",
                    serde_json::to_string_pretty(&object).unwrap_or_default()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Deletes the objects it names when dropped (a case's objects, so that later cases' agents,
/// which may share node names, never see them), failed case or not.
pub struct Cleanup<'a> {
    admin: &'a Admin,
    docs: Vec<Value>,
}

impl<'a> Cleanup<'a> {
    pub fn new(admin: &'a Admin) -> Self {
        Cleanup {
            admin,
            docs: Vec::new(),
        }
    }

    /// Remembers `doc` for deletion and returns it.
    pub fn track(&mut self, doc: Value) -> Value {
        self.docs.push(doc.clone());
        doc
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for doc in self.docs.iter().rev() {
            if let Err(e) = self.admin.delete(doc) {
                eprintln!("cleanup of {}: {e}", doc["metadata"]["name"]);
            }
        }
    }
}

/// A Ready Node `name` with InternalIP `address`, as a kubelet registers it.
pub fn node(name: &str, address: &str) -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "VM test node"}],
            "addresses": [
                {"type": "InternalIP", "address": address},
                {"type": "Hostname", "address": name},
            ],
        },
    })
}
