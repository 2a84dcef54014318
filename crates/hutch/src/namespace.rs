//! `hutch namespace ...`: the server's `/v1/namespaces` routes (admin).

use crate::args::{ConnectionArgs, NamespaceArgs, NamespaceCommand};
use crate::client::Client;
use crate::config::Connection;
use crate::sandbox::{table, text};

pub async fn namespace(connection: &ConnectionArgs, args: NamespaceArgs) -> anyhow::Result<()> {
    let client = Client::new(Connection::resolve(connection)?)?;
    match args.command {
        NamespaceCommand::Ls => {
            let namespaces = client.get_json("/namespaces").await?;
            let rows: Vec<Vec<String>> = namespaces
                .as_array()
                .into_iter()
                .flatten()
                .map(|ns| vec![text(&ns["name"]), text(&ns["created_at"])])
                .collect();
            print!("{}", table(&["NAME", "CREATED"], &rows));
        }
        NamespaceCommand::Create { name } => {
            client.create_namespace(&name).await?;
            println!("{name}");
        }
        NamespaceCommand::Rm { name } => {
            client.delete_namespace(&name).await?;
            println!("{name}");
        }
    }
    Ok(())
}
